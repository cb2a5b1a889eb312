// The browser half of the conversation list (the server half: chatglm_web/conversations/browser_store.py).
// It only moves sealed text between localStorage and the page's events: the server seals and opens it.
//   localStorage   chatglm-web:conversation:<id>  the sealed tree     chatglm-web:meta:<id>  its sealed title/time
//   sessionStorage chatglm-web:tab                the conversation this tab shows (kept across a reload)
// Clicks on a message's version links (#version:<node>:<step>) go to the server through a hidden button.
window.chatglmStore = (() => {
  const DATA = "chatglm-web:conversation:", META = "chatglm-web:meta:", TAB = "chatglm-web:tab";
  // what versions before the list kept (read once by the server, then removed)
  const LEGACY = { conversation: "chatglm-web-conversation", settings: "chatglm-web-settings" };
  const ids = () => Object.keys(localStorage).filter((k) => k.startsWith(META)).map((k) => k.slice(META.length));
  const get = (key) => { try { return localStorage.getItem(key); } catch (e) { return null; } };
  const store = {
    tab: () => sessionStorage.getItem(TAB),
    read: (id) => (id ? get(DATA + id) : null),
    metas: () => ids().map((id) => [id, get(META + id), (get(DATA + id) || "").length + (get(META + id) || "").length]),
    all: () => ids().map((id) => [id, get(DATA + id)]).filter((entry) => entry[1]),
    // what a save sends: the stored copy of this tab's conversation (to merge) and the list
    current: () => ({ data: store.read(store.tab()), metas: store.metas() }),
    snapshot: () => {
      const hash = location.hash || "";
      return { data: store.read(store.tab()), metas: store.metas(), tab: store.tab(),
               share: hash.startsWith("#share=") ? hash.slice(7) : null, wide: window.innerWidth > 900,
               legacy: { conversation: get(LEGACY.conversation), settings: get(LEGACY.settings) } };
    },
    apply: (ops) => {
      if (!ops || typeof ops !== "object") return [];
      let listed = (ops.remove || []).length > 0;
      for (const id of ops.remove || []) {
        localStorage.removeItem(DATA + id); localStorage.removeItem(META + id);
        if (ops.forget) gone.add(id);
      }
      for (const [id, data, meta] of ops.put || []) {
        if (gone.has(id)) continue;   // deleted here meanwhile: a save that was under way does not bring it back
        if (get(META + id) === null) listed = true;
        try { localStorage.setItem(DATA + id, data); localStorage.setItem(META + id, meta); }
        catch (error) { console.warn("chatglm-web: the browser refused to store a conversation", error); }
      }
      if (ops.tab) sessionStorage.setItem(TAB, ops.tab);
      if (listed) listChanged();   // one came or went: the list shows what is stored, whatever order answers came in
      if (ops.drop_legacy) { localStorage.removeItem(LEGACY.conversation); localStorage.removeItem(LEGACY.settings); }
      if (ops.leave_share && location.hash.startsWith("#share=")) history.replaceState(null, "", location.pathname + location.search);
      return [];
    },
    pickFile: () => new Promise((resolve) => {
      const input = Object.assign(document.createElement("input"), { type: "file", accept: ".json,application/json" });
      input.addEventListener("change", () => {
        const file = input.files && input.files[0];
        if (!file) return resolve(null);
        if (file.size > 8 * 1024 * 1024) return resolve({ error: "too_large", size: file.size });
        file.text().then((text) => resolve({ text }), () => resolve(null));
      });
      input.addEventListener("cancel", () => resolve(null));
      input.click();
    }),
    // Undo of a delete: what was deleted may be stored again
    forgive: () => { gone.clear(); return []; },
    pendingVersion: null,
  };
  const gone = new Set();
  let refresh = null;
  const listChanged = () => {
    clearTimeout(refresh);
    refresh = setTimeout(() => document.querySelector("#list-refresh")?.click(), 250);
  };
  document.addEventListener("click", (event) => {
    const link = event.target.closest && event.target.closest('#chatbot a[href^="#version:"]');
    if (!link) return;
    event.preventDefault();
    event.stopPropagation();
    store.pendingVersion = link.getAttribute("href").slice("#version:".length);
    document.querySelector("#version-go")?.click();
  }, true);
  // another tab changed the list: this tab's list is read again (once the burst of writes is over)
  window.addEventListener("storage", (event) => {
    if (event.key === null || event.key.startsWith(META)) listChanged();
  });
  return store;
})();
