"""Conversations: what a visitor's chats are, where they are kept, and how they travel.

``tree``            a conversation as a tree of versions (Edit and Retry add siblings), its strict JSON form, merge
``sealed``          zlib + AES-GCM sealing with a key derived from the server's state secret
``browser_store``   the server half of the list kept in browsers: sealing, bounds, merge on save, import, export
``share``           share-link tokens (sealed for their purpose), the shown branch, replay and its word diff
``transcript``      a conversation as downloadable Markdown or JSON text
``legacy_storage``  what versions before the list kept in Gradio's BrowserState, opened once to move it

May import: ``generation`` and itself. Nothing of the page: how the page shows a conversation (markers,
strings) is handed in where needed (e.g. ``tree.from_history(..., ending_of=...)``).
"""
