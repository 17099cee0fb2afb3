"""Take the screenshots of the web page shown in the README.

Needs a running ``igora up`` (its gateway URL as ``--url``) and Debian's Chromium:

    .venv/bin/igora up --no-check &
    .venv/bin/python scripts/screenshots.py --url http://127.0.0.1:5678

Writes ``docs/screenshots/chat.png`` (a conversation, in French) and
``docs/screenshots/market.png`` (the market view while one task runs, one waits, one
was stopped and others are done, in English).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
LONG = 90_000  # ms


def open_page(ctx: BrowserContext, url: str, view: str, lang: str) -> Page:
    page = ctx.new_page()
    page.goto(f"{url}/#{view}")
    page.wait_for_selector("html[data-ready=true]")
    page.click(f"#lang-{lang}")
    page.wait_for_function("document.querySelector('#model option')?.value")
    return page


def ask(page: Page, prompt: str, *, preset: str, max_tokens: int, wait: bool = True,
        seed: int = 42) -> None:
    page.select_option("#preset", preset)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#seed", str(seed))
    page.fill("#prompt", prompt)
    n = page.locator(".msg-assistant").count()
    page.press("#prompt", "Enter")
    if wait:
        page.wait_for_function(
            "n => document.querySelectorAll('.msg-assistant')[n]?.dataset.finish", arg=n,
            timeout=LONG)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:5678", help="the gateway's URL")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    url = args.url.rstrip("/")
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        ctx = browser.new_context(viewport={"width": 1280, "height": 800}, locale="fr-FR",
                                  device_scale_factor=1)
        ctx.set_default_timeout(30_000)

        # The chat: two turns with the assistant, then the novelist.
        chat = open_page(ctx, url, "chat", "fr")
        chat.fill("#temperature", "0.3")
        ask(chat, "Quelle est la capitale de la France ?", preset="assistant", max_tokens=60)
        ask(chat, "Écris le début d'une histoire qui se passe sur un marché de Provence.",
            preset="romancier", max_tokens=160, seed=2)
        chat.locator("#prompt").fill("Et ensuite ?")
        chat.screenshot(path=str(args.out / "chat.png"))
        print(f"wrote {args.out / 'chat.png'}")

        # The market: one task stopped, one running, one waiting behind it.
        market = open_page(ctx, url, "market", "en")
        stopped = open_page(ctx, url, "chat", "fr")
        ask(stopped, "Raconte une très longue histoire.", preset="romancier", max_tokens=300,
            wait=False)
        stopped.wait_for_function(
            "() => (document.querySelector('.msg-assistant .body')?.textContent.length || 0) > 20",
            timeout=LONG)
        stopped.click("#stop")
        market.wait_for_selector("#board section[data-group=aborted] li.task", timeout=LONG)
        running = open_page(ctx, url, "chat", "en")
        ask(running, "Tell a long story about a lighthouse keeper.", preset="romancier",
            max_tokens=200, wait=False)
        market.wait_for_selector("#board section[data-group=running] li.task", timeout=LONG)
        waiting = open_page(ctx, url, "chat", "en")
        ask(waiting, "Translate: le marché ouvre à huit heures.", preset="traducteur",
            max_tokens=40, wait=False)
        market.wait_for_selector("#board section[data-group=waiting] li.task", timeout=LONG)
        time.sleep(1.0)  # let the throughput chart and slot counts settle on screen
        market.screenshot(path=str(args.out / "market.png"), full_page=True)
        print(f"wrote {args.out / 'market.png'}")
        for page in (running, waiting):
            page.wait_for_selector(".msg-assistant[data-finish]", timeout=LONG)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
