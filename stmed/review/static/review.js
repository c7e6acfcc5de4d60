// The review page: one item at a time, every action on a key, nothing lost on reload.
// A decision waits in localStorage until the server has it; a failed send is retried with the same form
// token, which the server recognises, so an answer is neither lost nor counted twice.
"use strict";
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const $ = (id) => document.getElementById(id);
const PENDING = "stmed-review-pending", DRAFT = "stmed-review-draft";
let item = null, busy = false;

function status(text) { $("status").textContent = text || ""; }

async function api(method, path, body) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: body ? { "Content-Type": "application/json", "X-CSRF-Token": csrf } : { "X-CSRF-Token": csrf },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (response.status === 401) { window.location = "/signin"; throw new Error("signed out"); }
  const data = await response.json().catch(() => ({}));
  return { status: response.status, data };
}

function draft() {
  const saved = JSON.parse(localStorage.getItem(DRAFT) || "null");
  return saved && item && saved.item_id === item.item_id ? saved : { item_id: item && item.item_id,
    ill_formed: false, starred: false, corrected: "" };
}
function saveDraft(change) { localStorage.setItem(DRAFT, JSON.stringify({ ...draft(), ...change })); showMarks(); }
function showMarks() {
  const d = draft();
  $("flag").setAttribute("aria-pressed", String(d.ill_formed));
  $("star").setAttribute("aria-pressed", String(d.starred));
  if (document.activeElement !== $("corrected")) $("corrected").value = d.corrected;
}

async function load() {
  const { status: code, data } = await api("GET", "/api/next");
  if (code !== 200) { status(data.error ? data.error.message : "could not load the next item; retrying");
                      setTimeout(load, 2000); return; }
  if (data.done) { item = null; $("card").hidden = true; $("done").hidden = false; $("count").textContent = "";
                   $("bar").style.width = "100%"; return; }
  item = data;
  $("done").hidden = true; $("card").hidden = false;
  $("question").textContent = item.question;
  $("answer-a").textContent = item.answer_a;
  $("answer-b").textContent = item.answer_b;
  $("image").src = item.image;
  const { done, total } = item.progress;
  $("count").textContent = `${done + 1} of ${total}`;
  $("bar").style.width = `${total ? (100 * done) / total : 0}%`;
  showMarks();
}

async function send(decision) {
  for (let delay = 1000; ; delay = Math.min(delay * 2, 15000)) {
    try {
      const { status: code, data } = await api("POST", "/api/decisions", decision);
      if (code === 200 || code === 201 || code === 409) {
        localStorage.removeItem(PENDING);
        status(code === 409 ? data.error.message : "");
        return;
      }
      if (code !== 503) { localStorage.removeItem(PENDING); status(data.error ? data.error.message : `error ${code}`);
                          return; }
    } catch (err) { if (err.message === "signed out") return; }
    status("Your answer is kept in this browser; sending it again…");
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

async function decide(choice) {
  if (!item || busy) return;
  busy = true;
  const d = draft();
  const decision = { item_id: item.item_id, form: item.form, choice, ill_formed: d.ill_formed,
                     starred: d.starred, corrected: $("corrected").value.trim() };
  localStorage.setItem(PENDING, JSON.stringify(decision));
  await send(decision);
  localStorage.removeItem(DRAFT);
  $("corrected").value = "";
  await load();
  busy = false;
}

async function undo() {
  if (busy) return;
  busy = true;
  const { data } = await api("POST", "/api/undo");
  status(data.undone_item_id ? "Undone: the last item is back." : "Nothing to undo.");
  await load();
  busy = false;
}

const KEYS = { a: () => decide("A"), 1: () => decide("A"), b: () => decide("B"), 2: () => decide("B"),
               t: () => decide("tie"), w: () => decide("both_wrong"), u: undo,
               f: () => saveDraft({ ill_formed: !draft().ill_formed }),
               s: () => saveDraft({ starred: !draft().starred }),
               c: () => $("corrected").focus() };

document.addEventListener("keydown", (event) => {
  if (event.target === $("corrected")) {
    if (event.key === "Escape") $("corrected").blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const action = KEYS[event.key.toLowerCase()];
  if (action) { event.preventDefault(); action(); }
});
document.querySelectorAll("[data-choice]").forEach((b) => b.addEventListener("click", () => decide(b.dataset.choice)));
$("flag").addEventListener("click", KEYS.f);
$("star").addEventListener("click", KEYS.s);
$("undo").addEventListener("click", undo);
$("corrected").addEventListener("input", () => saveDraft({ corrected: $("corrected").value }));
$("image").addEventListener("load", () => $("image").classList.toggle("small", $("image").naturalWidth < 256));

(async () => {
  const pending = JSON.parse(localStorage.getItem(PENDING) || "null");
  if (pending) await send(pending);
  await load();
})();
