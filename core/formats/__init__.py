"""On-disk formats: the quantmint checkpoint (`checkpoint`: writer and verifying reader;
`checkpoint_format`: the typed, versioned schema; `checkpoint_docs`: its generated docs), export to
compressed-tensors (`export`), safetensors read and written one tensor at a time (`safetensors_io`),
Hugging Face directory helpers (`hf`) and header-only summaries (`summary`)."""
