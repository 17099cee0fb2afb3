// French and English strings of the page, and the language switch.

export const STRINGS = {
  en: {
    "skip": "Skip to content",
    "views": "Views",
    "language": "Language",
    "tab.chat": "Chat",
    "tab.market": "Market",
    "settings": "Settings",
    "model": "Model",
    "model.none": "no model on the market",
    "model.any": "any model",
    "model.hint.none": "No worker is on the market yet.",
    "model.hint.count": "{n} model(s) on the market.",
    "preset": "Preset",
    "preset.custom": "Custom",
    "preset.assistant": "Assistant",
    "preset.romancier": "Novelist (romancier)",
    "preset.traducteur": "Translator",
    "preset.professeur": "Teacher",
    "preset.poete": "Poet",
    "system": "System prompt",
    "temperature": "Temperature",
    "seed": "Seed",
    "seed.random": "random",
    "maxTokens": "Max tokens",
    "format": "Answer format",
    "format.text": "Text",
    "format.json": "JSON object",
    "toolCall": "Tool call",
    "json": "JSON",
    "newChat": "New conversation",
    "apiKey.more": "Gateway API key",
    "apiKey": "API key",
    "apiKey.placeholder": "only if the gateway asks for one",
    "conversation": "Conversation",
    "empty": "Ask the market something.",
    "prompt": "Your message",
    "prompt.placeholder": "Message (Enter to send, Shift+Enter for a new line)",
    "send": "Send",
    "stop": "Stop",
    "you": "You",
    "assistant": "Answer",
    "stopped": "Stopped.",
    "restarted": "The worker was lost; the answer restarts on another worker.",
    "waiting": "Waiting for a worker…",
    "finish.length": "Stopped at the token limit.",
    "err.no_worker": "No worker serves this model right now. Start one with `igora worker`, or pick another model.",
    "err.unknown_model": "This model is not on the market.",
    "err.timeout": "No answer in time: the task timed out.",
    "err.bad_request": "The request was refused: {msg}",
    "err.failed": "The task failed: {msg}",
    "err.market": "The gateway is not connected to the market right now; retry in a moment.",
    "err.aborted": "The task was aborted on the market.",
    "err.auth": "The gateway refused the API key: give the right one under “Gateway API key”.",
    "err.network": "The gateway cannot be reached. Is `igora up` still running?",
    "err.empty": "Write a message first.",
    "agents": "Agents",
    "col.type": "Type",
    "col.name": "Name",
    "col.state": "State",
    "col.models": "Models",
    "col.slots": "Slots",
    "col.speed": "Speed",
    "col.engine": "Engine",
    "type.worker": "worker",
    "type.broker": "broker",
    "type.client": "client",
    "state.ready": "ready",
    "state.working": "working",
    "state.busy": "busy",
    "leader": "active",
    "standby": "standby",
    "you.agent": "this page's gateway",
    "noAgents": "No agent on the market.",
    "throughput": "Throughput",
    "tasksPerMin": "tasks / min",
    "tokensPerSec": "tokens / s",
    "chart.label": "Throughput over the last 5 minutes",
    "tasks": "Tasks",
    "group.waiting": "Waiting",
    "group.running": "Running",
    "group.done": "Done",
    "group.failed": "Failed",
    "group.aborted": "Aborted",
    "task.state.todo": "to assign",
    "task.state.prepared": "assigned",
    "task.asker": "asked by",
    "task.worker": "run by",
    "task.tokens": "{n} tokens",
    "task.attempt": "attempt {n}",
    "task.abortAsked": "stop asked",
    "noTasks": "none",
    "market.live": "Live · room “{room}” · updated {time}",
    "market.offline": "Connection to the gateway lost; retrying…",
    "market.connecting": "Connecting…",
  },
  fr: {
    "skip": "Aller au contenu",
    "views": "Vues",
    "language": "Langue",
    "tab.chat": "Discussion",
    "tab.market": "Marché",
    "settings": "Réglages",
    "model": "Modèle",
    "model.none": "aucun modèle sur le marché",
    "model.any": "n’importe quel modèle",
    "model.hint.none": "Aucun worker sur le marché pour l’instant.",
    "model.hint.count": "{n} modèle(s) sur le marché.",
    "preset": "Préréglage",
    "preset.custom": "Personnalisé",
    "preset.assistant": "Assistant",
    "preset.romancier": "Romancier",
    "preset.traducteur": "Traducteur",
    "preset.professeur": "Professeur",
    "preset.poete": "Poète",
    "system": "Prompt système",
    "temperature": "Température",
    "seed": "Graine",
    "seed.random": "aléatoire",
    "maxTokens": "Tokens max.",
    "format": "Format de la réponse",
    "format.text": "Texte",
    "format.json": "Objet JSON",
    "toolCall": "Appel d’outil",
    "json": "JSON",
    "newChat": "Nouvelle conversation",
    "apiKey.more": "Clé d’API de la passerelle",
    "apiKey": "Clé d’API",
    "apiKey.placeholder": "seulement si la passerelle en demande une",
    "conversation": "Conversation",
    "empty": "Posez une question au marché.",
    "prompt": "Votre message",
    "prompt.placeholder": "Message (Entrée pour envoyer, Maj+Entrée pour aller à la ligne)",
    "send": "Envoyer",
    "stop": "Arrêter",
    "you": "Vous",
    "assistant": "Réponse",
    "stopped": "Arrêté.",
    "restarted": "Le worker a été perdu ; la réponse reprend sur un autre worker.",
    "waiting": "En attente d’un worker…",
    "finish.length": "Arrêté à la limite de tokens.",
    "err.no_worker": "Aucun worker ne sert ce modèle en ce moment. Lancez-en un avec `igora worker`, ou choisissez un autre modèle.",
    "err.unknown_model": "Ce modèle n’est pas sur le marché.",
    "err.timeout": "Pas de réponse à temps : la tâche a expiré.",
    "err.bad_request": "La requête a été refusée : {msg}",
    "err.failed": "La tâche a échoué : {msg}",
    "err.market": "La passerelle n’est pas connectée au marché pour l’instant ; réessayez dans un moment.",
    "err.aborted": "La tâche a été annulée sur le marché.",
    "err.auth": "La passerelle a refusé la clé d’API : indiquez la bonne sous « Clé d’API de la passerelle ».",
    "err.network": "La passerelle est injoignable. `igora up` tourne-t-il toujours ?",
    "err.empty": "Écrivez d’abord un message.",
    "agents": "Agents",
    "col.type": "Type",
    "col.name": "Nom",
    "col.state": "État",
    "col.models": "Modèles",
    "col.slots": "Places",
    "col.speed": "Vitesse",
    "col.engine": "Moteur",
    "type.worker": "worker",
    "type.broker": "broker",
    "type.client": "client",
    "state.ready": "prêt",
    "state.working": "au travail",
    "state.busy": "occupé",
    "leader": "actif",
    "standby": "en réserve",
    "you.agent": "la passerelle de cette page",
    "noAgents": "Aucun agent sur le marché.",
    "throughput": "Débit",
    "tasksPerMin": "tâches / min",
    "tokensPerSec": "tokens / s",
    "chart.label": "Débit des 5 dernières minutes",
    "tasks": "Tâches",
    "group.waiting": "En attente",
    "group.running": "En cours",
    "group.done": "Terminées",
    "group.failed": "Échouées",
    "group.aborted": "Annulées",
    "task.state.todo": "à attribuer",
    "task.state.prepared": "attribuée",
    "task.asker": "demandée par",
    "task.worker": "exécutée par",
    "task.tokens": "{n} tokens",
    "task.attempt": "essai {n}",
    "task.abortAsked": "arrêt demandé",
    "noTasks": "aucune",
    "market.live": "En direct · salle « {room} » · mis à jour à {time}",
    "market.offline": "Connexion à la passerelle perdue ; nouvelle tentative…",
    "market.connecting": "Connexion…",
  },
};

const KEY = "igora.lang";
let current = "en";
const listeners = [];

export function pickLanguage() {
  const saved = localStorage.getItem(KEY);
  if (saved && STRINGS[saved]) return saved;
  const wanted = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
  for (const l of wanted) {
    const base = String(l).toLowerCase().slice(0, 2);
    if (STRINGS[base]) return base;
  }
  return "en";
}

export function lang() { return current; }

/** The string for `key` in the current language, with {name} placeholders filled. */
export function t(key, vars = {}) {
  const s = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  return s.replace(/\{(\w+)\}/g, (_, k) => (k in vars ? String(vars[k]) : `{${k}}`));
}

export function onLanguage(fn) { listeners.push(fn); }

export function setLanguage(code, remember = true) {
  if (!STRINGS[code]) return;
  current = code;
  if (remember) localStorage.setItem(KEY, code);
  document.documentElement.lang = code;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of document.querySelectorAll("[data-i18n-aria-label]")) el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
  for (const code2 of Object.keys(STRINGS)) {
    const b = document.getElementById(`lang-${code2}`);
    if (b) b.setAttribute("aria-pressed", String(code2 === code));
  }
  for (const fn of listeners) fn(code);
}
