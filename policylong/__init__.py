"""PolicyLong: on-policy long-context training of LLMs (context extension by self-screened
continual pretraining; long-context post-training)."""

import os
import warnings

# Nothing is downloaded at run time: the Hugging Face hub reads these when it is first imported,
# which any policylong module may do, so they are set before any of them loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# megatron-core warns once per module at import on a machine without Transformer Engine or
# Apex (6 warnings per process, on every CPU run): the fallbacks it names are the ones we use.
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")
warnings.filterwarnings("ignore", message=".*Apex.*")
