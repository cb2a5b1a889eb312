"""The page's CSS: part of the page, not of ``assets/style.css``, so that re-branding cannot break it.

* one scroll: the page is exactly the viewport; the chat takes what the top bar and composer leave;
* the composer is second in the DOM (after the top bar, for the Tab order) and shown under the chat;
* the chat's Clear button sits in a row of its own, never over a message;
* while a reply streams (``.busy``) Retry, Undo and Edit are disabled in look and to the pointer;
* touch targets of at least 44 px (buttons) and 32 px (a message's icons) on phones;
* messages may contain HTML (sanitized: no scripts, but inline styles stay). Containment makes each
  bubble the containing block of fixed/absolute children and clips them, so no message can cover
  the page.
"""

#: The chat's own buttons, by their accessible names in each language Gradio's front end labels them in.
CHAT_BUTTONS = {"retry": ("Retry", "重试"), "undo": ("Undo", "撤销"), "edit": ("Edit", "编辑"),
                "clear": ("Clear", "清空对话")}


def _buttons(prefix: str, *names: str) -> str:
    return ",\n".join(f'{prefix} button[aria-label="{label}"]' for name in names for label in CHAT_BUTTONS[name])


PAGE_CSS = """
html, body { height: 100%; }
body { overflow: hidden; }
gradio-app, .gradio-container { height: 100dvh !important; max-height: 100dvh; }
.gradio-container { display: flex !important; flex-direction: column; padding-top: 0 !important; }
.gradio-container > .main { flex: 1 1 0; min-height: 0; display: flex; flex-direction: column; }
.gradio-container > .main > .wrap, .gradio-container > .main .contain { flex: 1 1 0; min-height: 0;
  display: flex; flex-direction: column; }
footer { flex: 0 0 auto; padding: 2px 0 !important; margin: 0 !important; }

#topbar { flex: 0 0 auto; align-items: center; gap: 8px; flex-wrap: nowrap; padding: 6px 36px 2px 0; }  /* room for the drawer's own toggle */
#topbar > * { min-width: 0; }
#model-title { flex: 1 1 0 !important; min-width: 0 !important; overflow: hidden; }
.topbar-title { display: flex; align-items: baseline; gap: 10px; min-width: 0; }
#model-title .topbar-title h1 { margin: 0; font-size: 1.15rem; line-height: 1.3; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; min-width: 0; }
#model-title .topbar-subtitle { margin: 0; font-size: 0.85rem; color: var(--body-text-color-subdued);
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#language-switch, #open-settings { flex: 0 0 auto; min-height: 36px; }

#banner { flex: 0 0 auto; }
.demo-banner { margin: 0; padding: 6px 12px; border-radius: 8px; font-size: 0.9rem;
  background: #fff4d6; color: #4a3500; border: 1px solid #e6c25a; }
.dark .demo-banner { background: #3a2e05; color: #ffe8a3; border-color: #7a6212; }

#main { flex: 1 1 0 !important; min-height: 0; display: flex; flex-direction: column; gap: 8px; }
#chatbot { order: 1; flex: 1 1 0 !important; min-height: 0 !important; height: auto !important; }
#composer-area { order: 2; flex: 0 0 auto !important; gap: 2px; }
#composer { flex: 0 0 auto; align-items: flex-end; gap: 8px; flex-wrap: nowrap; }
#meter-row { flex: 0 0 auto; align-items: center; gap: 8px; flex-wrap: nowrap; min-height: 0; }
#token-meter { flex: 1 1 auto !important; min-width: 0 !important; }
#token-meter .token-meter { margin: 0; font-size: 0.8rem; color: var(--body-text-color-subdued); white-space: nowrap;
  overflow: hidden; text-overflow: ellipsis; }
#view-prompt { flex: 0 0 auto !important; min-width: 0 !important; width: auto !important; white-space: nowrap;
  font-size: 0.8rem; padding: 2px 8px; }
.hidden-helper { display: none !important; }
.visually-hidden { position: absolute !important; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
  white-space: nowrap; }
#share-banner .share-banner { margin: 0; padding: 6px 12px; border-radius: 8px; font-size: 0.9rem;
  background: #e6f0ff; color: #0b2e66; border: 1px solid #8fb3ef; }
.dark #share-banner .share-banner { background: #0f2547; color: #d6e6ff; border-color: #3b5f99; }
#share-actions { flex: 0 0 auto; gap: 8px; }
#replay-result { flex: 0 0 auto; max-height: 40vh; overflow: auto; }
.replay-panel { padding: 6px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px; font-size: 0.9rem; }
.replay-panel del { background: #ffd7d5; color: #5c0a06; }
.replay-panel ins { background: #d3f5dd; color: #073b17; }
.dark .replay-panel del { background: #5c1410; color: #ffd9d6; }
.dark .replay-panel ins { background: #0d3d1c; color: #d4f7de; }
.version-nav { font-size: 0.85rem; color: var(--body-text-color-subdued); white-space: nowrap; }
.version-nav a { text-decoration: none; padding: 2px 8px; border-radius: 6px; }
.version-nav a:hover, .version-nav a:focus-visible { background: var(--background-fill-secondary); }
.version-nav .nav-end { padding: 2px 8px; opacity: 0.35; }
/* a message's version links: a plain line under it, not a bubble of its own, without Copy and Edit (Retry and
   Undo stay: under the last message they are the chat's own) */
#chatbot .message:has(.version-nav), #chatbot .message:has(.version-nav) > div { background: transparent !important;
  border: none !important; box-shadow: none !important; padding: 0 !important; min-height: 0 !important; }
#chatbot .message-row:has(.version-nav) { margin-top: -6px !important; margin-bottom: 0 !important; }
#chatbot .message-row:has(.version-nav) + .message-buttons button[aria-label="Copy message"],
#chatbot .message-row:has(.version-nav) + .message-buttons button[title="Copy message"],
{nav_edit} { display: none !important; }
#conversation-list { max-height: 50vh; overflow-y: auto; }
#conversation-list .wrap { display: flex; flex-direction: column; gap: 2px; }
#conversation-list label { width: 100%; justify-content: flex-start; border-radius: 8px; padding: 6px 10px; }
#conversation-list label span { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#list-note { font-size: 0.8rem; color: var(--body-text-color-subdued); }
#list-note p { margin: 0 0 4px; }
#reply-stats { order: 4; flex: 0 0 auto; font-size: 0.85rem; min-height: 1.4em; }
#reply-stats p { margin: 0; }
#send, #stop { min-height: 44px; }
/* documents (page/document_chips.py): the 📎 button, the pending chips over the message box, the chips under a
   message and the line under a reply saying what of them the model saw */
#attach { flex: 0 0 44px !important; min-width: 44px !important; width: 44px !important; align-self: flex-end;
  padding: 0 !important; margin: 0 !important; }
#attach .html-container { padding: 0 !important; }
#attach .attach-button { width: 44px; min-height: 44px; padding: 0; border-radius: 12px; font-size: 1.2rem;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-primary); cursor: pointer; }
#attach .attach-button:hover, #attach .attach-button:focus-visible { background: var(--background-fill-secondary); }
#attachments { flex: 0 0 auto; min-height: 0; }
.doc-pending { display: flex; flex-wrap: wrap; align-items: center; gap: 6px; font-size: 0.85rem; }
.doc-pending-note { color: var(--body-text-color-subdued); }
.doc-chip { display: inline-flex; align-items: center; gap: 4px; max-width: 100%; padding: 2px 10px;
  border-radius: 999px; border: 1px solid var(--border-color-primary); background: var(--background-fill-secondary);
  font-size: 0.85rem; overflow-wrap: anywhere; }
.doc-chip .doc-gone { color: var(--body-text-color-subdued); }
.chip-remove { border: none; background: transparent; color: inherit; cursor: pointer; padding: 0 4px;
  min-width: 24px; min-height: 24px; border-radius: 6px; }
.chip-remove:hover, .chip-remove:focus-visible { background: var(--background-fill-primary); }
.doc-chips { display: flex; flex-wrap: wrap; gap: 6px; justify-content: flex-end; }
.doc-note { display: block; font-size: 0.85rem; color: var(--body-text-color-subdued); }
#chatbot .message-row:has(.doc-chips) + .message-buttons button[aria-label="Edit"],
#chatbot .message-row:has(.doc-chips) + .message-buttons button[aria-label="编辑"] { display: none !important; }
#chatbot .message:has(.doc-chips), #chatbot .message:has(.doc-chips) > div,
#chatbot .message:has(.doc-note), #chatbot .message:has(.doc-note) > div { background: transparent !important;
  border: none !important; box-shadow: none !important; padding: 0 !important; min-height: 0 !important; }
#chat-input textarea { border: 1px solid var(--border-color-primary) !important; border-radius: 12px !important;
  padding: 10px 12px !important; }

{busy} {
  pointer-events: none; opacity: 0.35; }
/* a shared conversation is read-only: only Copy stays */
{readonly},
#chatbot.readonly .version-nav a { display: none !important; }

/* the chat's own buttons (Clear) get a row of their own instead of floating over the messages */
#chatbot .wrapper > .icon-button-wrapper.top-panel { position: static !important; display: flex; align-self: flex-end;
  justify-content: flex-end; margin: 0 !important; padding: 2px 4px; }
#chatbot .wrapper { display: flex; flex-direction: column; }
#chatbot .wrapper > :not(.icon-button-wrapper) { flex: 1 1 0; min-height: 0; }

#chatbot [data-testid="user"], #chatbot [data-testid="bot"] { contain: layout paint; isolation: isolate;
  overflow: auto; }

@media (max-width: 640px) {
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  .topbar-subtitle { display: none; }
  #language-switch, #open-settings, #send, #stop, #new-chat, #undo-delete { min-height: 44px; min-width: 44px; }
  #view-prompt { min-height: 32px !important; }
  #chatbot button { min-width: 32px; min-height: 32px; }
  .chip-remove { min-width: 32px; min-height: 32px; }
  footer a { min-height: 28px !important; }
  #settings-drawer input[type="number"], #settings-drawer button { min-height: 32px !important; }
  #settings-drawer input[type="range"] { padding: 10px 0 !important; box-sizing: content-box !important; }
}
""".replace("{nav_edit}", _buttons("#chatbot .message-row:has(.version-nav) + .message-buttons", "edit")) \
    .replace("{busy}", _buttons("#chatbot.busy", "retry", "undo", "edit", "clear")) \
    .replace("{readonly}", _buttons("#chatbot.readonly", "retry", "undo", "edit", "clear"))
