"""ChatGLM3-style chat API for RWKV causal LMs (``model.chat``, ``model.stream_chat``, ``model.process_response``)."""


class RwkvChatModelMixin:
    """Mixed into ``RwkvForCausalLM``; built only on the public ``generate()`` and streamers."""
