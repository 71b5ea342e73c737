"""cloudtune: fine-tune an LLM on the cheapest rented GPU that fits, and leave nothing running.

Keep this module import-free: `cloudtune --help` and `cloudtune plan` must start fast, so heavy
libraries (torch, transformers, boto3, provider SDKs) are imported only where they are used.
"""

__version__ = "0.1.0"
