"""Drop-in replacements for the symmetric-memory allocator modules of serving engines.

``symm_rs.compat.sglang`` has the public names of SGLang's
``sglang.srt.distributed.device_communicators.pynccl_allocator``, and ``symm_rs.compat.vllm``
those of vLLM's ``vllm.distributed.device_communicators.pynccl_allocator``, with the same
signatures and meaning, backed by symm_rs: an engine switches by changing one import.
"""
