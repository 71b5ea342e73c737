"""What happens to a finished job's model: merge the adapter into its base, convert to GGUF (for
llama.cpp / Ollama), push to the Hugging Face Hub.

One module per job: `source.py` turns `JOB|DIR` into a local folder plus the base model it needs,
`merge.py` merges with PEFT's `merge_and_unload`, `llama_cpp.py` finds llama.cpp's converter script,
`gguf.py` runs it, `hub.py` pushes with huggingface_hub. Heavy libraries are imported inside the
functions, so `cloudtune --help` stays fast.
"""
