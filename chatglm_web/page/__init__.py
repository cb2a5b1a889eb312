"""The Gradio page: what a visitor sees and does. Nothing here knows a model family.

``layout``   the page, composed from public Gradio Blocks parts; ``build_page`` and ``launch_kwargs``
``turns``    send, stop, retry, undo, edit, version links: the page's turn controls as plain functions
``chat``     one turn from the page's inputs to streamed updates, and the ``/chat`` API endpoint
``conversation_view``  a conversation tree as the chat shows it (markers, ‹ 2 / 3 › version links)
``conversation_list``  the list in the sidebar, and saving (``store.js`` is its browser half)
``sharing``  share links, the read-only view, Replay
``meter``    the token meter and the exact prompt
``attachments``     documents attached to a message (📎; ``documents.js`` is its browser half): the page's steps,
                   and the documents into the prompt (whole or passages)
``document_store``  the sessions' documents in memory, their caps per session, client and server, dropped when
                   the session ends
``document_chips``  how documents look: the 📎 button, chips, the note under a reply
``steps``    how a tool step looks in the chat
``markers``  how a reply ended (stopped, cut off, failed, interrupted), kept with the conversation
``strings``  every string in English and Chinese (``gr.I18n`` and the server's own lookups)
``style``    the page's CSS (layout, contrast, touch targets, message containment)

May import ``generation``, ``messages``, ``settings``, ``families`` (the tool-call dialect, through
``families.registry``), ``tools`` (agent, toolbox), ``conversations``, ``documents``, ``branding`` and
``browser_secret``; nothing imports the page but ``server``.
"""

from chatglm_web.page.chat import conversation, stats_markdown
from chatglm_web.page.layout import STORAGE_KEY, SETTINGS_KEY, build_page, launch_kwargs

__all__ = ["STORAGE_KEY", "SETTINGS_KEY", "build_page", "conversation", "launch_kwargs", "stats_markdown"]
