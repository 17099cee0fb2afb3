// Credits (docs/credits.md): the balance of the identity the page's requests speak as,
// from the gateway's GET /v1/igora/balance, and amounts shown in credits.

import { t, lang, onLanguage } from "./i18n.js";

const REFRESH_MS = 15000;           // the balance is asked again this often
const AFTER_ANSWER_MS = [0, 1500, 4000];  // and after an answer (the market settles its
                                          // receipt once the worker claims it)
let headersOf = () => ({});
let shown = null;                   // the last balance, in millicredits
let timers = [];

/** Millicredits as credits with three decimals, in the page's language ("98.740"). */
export function creditsText(milli) {
  return new Intl.NumberFormat(lang(), { minimumFractionDigits: 3, maximumFractionDigits: 3 })
    .format(milli / 1000);
}

function render() {
  const el = document.getElementById("balance");
  if (shown === null) { el.hidden = true; return; }
  el.hidden = false;
  el.dataset.millicredits = String(shown);
  el.textContent = t("balance", { credits: creditsText(shown) });
  el.title = t("balance.title");
}

/** Ask the gateway for the balance. A room without credits (404, protocol 2) or a
 * refused key (401, 403) hides it; a market that does not answer keeps the last one. */
export async function refreshBalance() {
  try {
    const r = await fetch("/v1/igora/balance", { headers: headersOf() });
    if (r.ok) {
      const body = await r.json();
      if (Number.isInteger(body.balance)) shown = body.balance;
    } else if (r.status < 500) {
      shown = null;
    }
  } catch { /* the gateway is gone: the market view says so */ }
  render();
}

/** After an answer: now, and again while the market settles its receipt. */
export function balanceAfterAnswer() {
  for (const id of timers) clearTimeout(id);
  timers = AFTER_ANSWER_MS.map((ms) => setTimeout(refreshBalance, ms));
}

export function initBalance(headers) {
  headersOf = headers;
  refreshBalance();
  setInterval(refreshBalance, REFRESH_MS);
  onLanguage(render);
}
