"""Self-hosted, Tinker-compatible, multi-tenant LoRA training and sampling service.

Run it with ``python -m trainer_api serve --base-model ID_OR_DIR``; drive it with the
official ``tinker`` SDK (``tinker.ServiceClient(base_url=..., api_key=...)``).
"""
