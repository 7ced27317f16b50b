"""PolicyLong: on-policy long-context training of LLMs (context extension by self-screened
continual pretraining; long-context post-training)."""

import os

# Nothing is downloaded at run time: the Hugging Face hub reads these when it is first imported,
# which any policylong module may do, so they are set before any of them loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
