"""Kubernetes operator for DPOJob: QLoRA SFT then DPO of language models, with live status."""
