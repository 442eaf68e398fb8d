"""``rwkv-hf chat MODEL_DIR``: an interactive streaming chat in the terminal (ChatRWKV's commands)."""


def add_chat_parser(sub):
    chat = sub.add_parser("chat", help="interactive streaming chat with a converted model")
    chat.add_argument("model_dir")


def main_chat(args) -> int:
    raise NotImplementedError("rwkv-hf chat is being written")
