"""The bundled SmolLM2-135M model answers through the market (llama.cpp worker)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from igora import Client, NoWorkerError
from igora.credits import pricing

from .conftest import Cluster


async def test_real_model_answers_a_question(llama_market: Cluster) -> None:
    async with Client(llama_market.url) as client:
        text = await client.chat(
            "What is the capital of France? Answer in one short sentence.",
            max_tokens=24,
            temperature=0.0,
            seed=7,
        )
    assert "Paris" in text


async def test_real_model_is_deterministic_with_a_seed_and_honours_max_tokens(
    llama_market: Cluster,
) -> None:
    async with Client(llama_market.url) as client:
        a = await (
            await client.submit(
                "Tell me a story about a cat.", max_tokens=12, temperature=0.8, seed=42
            )
        ).result()
        b = await (
            await client.submit(
                "Tell me a story about a cat.", max_tokens=12, temperature=0.8, seed=42
            )
        ).result()
    assert a.text == b.text and a.text
    assert a.finish_reason == "length"
    assert a.usage["completionTokens"] == 12
    assert a.usage["promptTokens"] > 5


async def test_real_model_streams_system_prompt_and_messages(llama_market: Cluster) -> None:
    messages = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Now tell me a short story about a cat."},
    ]
    async with Client(llama_market.url) as client:
        pieces = [
            p
            async for p in await client.chat(
                messages,
                system="You are a concise assistant.",
                max_tokens=40,
                temperature=0.0,
                stream=True,
            )
        ]
    assert len(pieces) >= 2  # streamed, not delivered in one block
    assert "".join(pieces).strip()


async def test_real_model_worker_advertises_model_context_slots_and_speed(
    llama_market: Cluster,
) -> None:
    (worker,) = llama_market.agents("worker")
    assert worker["engine"] == "llama.cpp"
    assert worker["models"][0]["name"].startswith("SmolLM2-135M-Instruct")
    assert worker["models"][0]["contextLength"] == 2048
    # its size, counted by llama.cpp from the GGUF file, prices its runs (credits.md §1)
    params = worker["models"][0]["params"]
    assert Decimal("0.13") < Decimal(params) < Decimal("0.14")
    assert pricing.factor(params) == 2
    assert worker["slots"] == 2
    assert worker["speed"] > 0
    async with Client(llama_market.url) as client:
        with pytest.raises(NoWorkerError):
            await client.chat("hi", model="not-served", wait_worker=0)
