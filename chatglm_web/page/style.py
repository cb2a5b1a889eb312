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
#composer { order: 2; flex: 0 0 auto; align-items: flex-end; gap: 8px; flex-wrap: nowrap; }
#undo-clear { order: 3; flex: 0 0 auto; align-self: center; }
#reply-stats { order: 4; flex: 0 0 auto; font-size: 0.85rem; min-height: 1.4em; }
#reply-stats p { margin: 0; }
#send, #stop { min-height: 44px; }
#chat-input textarea { border: 1px solid var(--border-color-primary) !important; border-radius: 12px !important;
  padding: 10px 12px !important; }

#chatbot.busy button[aria-label="Retry"], #chatbot.busy button[aria-label="Undo"],
#chatbot.busy button[aria-label="Edit"], #chatbot.busy button[aria-label="Clear"] {
  pointer-events: none; opacity: 0.35; }

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
  #language-switch, #open-settings, #send, #stop, #undo-clear { min-height: 44px; min-width: 44px; }
  #chatbot button { min-width: 32px; min-height: 32px; }
  footer a { min-height: 28px !important; }
  #settings-drawer input[type="number"], #settings-drawer button { min-height: 32px !important; }
  #settings-drawer input[type="range"] { padding: 10px 0 !important; box-sizing: content-box !important; }
}
"""
