// Entry point: language, tabs, then the chat and the market view.

import { pickLanguage, setLanguage } from "./i18n.js";
import { initChat, modelsFromMarket } from "./chat.js";
import { followMarket, initMarket, onSnapshot, redraw } from "./market.js";

function showView() {
  const view = location.hash === "#market" ? "market" : "chat";
  for (const v of ["chat", "market"]) {
    document.getElementById(`view-${v}`).hidden = v !== view;
    const tab = document.getElementById(`tab-${v}`);
    if (v === view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  followMarket(view === "market" && document.visibilityState !== "hidden");
  if (view === "market") redraw();
}

setLanguage(pickLanguage(), false);
for (const code of ["fr", "en"]) {
  document.getElementById(`lang-${code}`).addEventListener("click", () => setLanguage(code));
}
window.addEventListener("hashchange", showView);
document.addEventListener("visibilitychange", showView);
initChat();
initMarket();
showView();
onSnapshot((snap) => {
  modelsFromMarket(snap.agents.filter((a) => a.type === "worker").flatMap((a) => a.models.map((m) => m.name)));
});
document.documentElement.dataset.ready = "true";
