"""LoRA SFT trainer: PEFT adapters from a Hugging Face Accelerate loop."""
