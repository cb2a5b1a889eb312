"""ChatGLM3 chat demo: parse settings -> load the model once -> build the page -> launch.

    python app.py                      # THUDM/chatglm3-6b (offline demo model if unreachable)
    python app.py --model /path/to/chatglm3-6b --precision 4bit
    python app.py --zero-gpu           # each reply in a @spaces.GPU call (on by itself on ZeroGPU Spaces)
    python app.py --help               # every flag; each also has a CHATGLM_WEB_* env var

Also the entry point of the Hugging Face Space (README's front matter: app_file).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls to outside hosts

from chatglm_web import spaces_env  # noqa: E402

# Before anything imports huggingface_hub or touches CUDA: the Hub cache in a Space's /data,
# and `import spaces` first in ZeroGPU mode.
spaces_env.prepare_process()

from chatglm_web.server import main  # noqa: E402

if __name__ == "__main__":
    main()
