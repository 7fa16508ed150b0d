"""The kernel the trainer and the service share: the adapter folder, what a LoRA folder may hold, the
prompt template and the progress line. Standard library only at import (no torch); it imports nothing
else of the project, so both products can depend on it and on nothing of each other.
"""
