"""ChatGLM3 chat demo: parse settings -> load the model once -> build the page -> launch.

    python app.py                      # THUDM/chatglm3-6b (offline demo model if unreachable)
    python app.py --model /path/to/chatglm3-6b --precision 4bit
    python app.py --help               # every flag; each also has a CHATGLM_WEB_* env var
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls to outside hosts

from chatglm_web.server import main  # noqa: E402

if __name__ == "__main__":
    main()
