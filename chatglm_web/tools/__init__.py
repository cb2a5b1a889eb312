"""Tools and the code interpreter.

``registry``          tools defined as Python modules in a folder (``assets/tools/``): schema-checked
                      arguments, each call run with a timeout
``workers``           the processes that run tool code (never the server's own)
``sandbox``           a sandboxed Jupyter kernel per browser session for the code interpreter
                      (``sandbox_launcher``, ``cgroup``: the kernel's walls)
``agent``             the loop of a tool turn: generate, run the call, feed the observation back
``toolbox``           which of these a server offers (chat, tools, interpreter), built from the settings

May import: ``generation``, ``settings``, ``families`` and itself. Not ``engine``, ``backends``, ``api``,
``page`` or ``server``.
"""
