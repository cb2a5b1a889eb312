"""ChatGLM3's tools and code interpreter.

``registry``  tools defined as Python modules in a folder (``assets/tools/``): schema-checked
              arguments, each call run with a timeout.
``workers``   the processes that run tool code (never the server's own).
``sandbox``   a sandboxed Jupyter kernel per browser session for the code interpreter.
"""
