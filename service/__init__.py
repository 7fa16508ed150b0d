"""LitServe service: many LoRA adapters on one shared base model."""
