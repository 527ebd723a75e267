"""Test and measurement tools of the repository (not part of the installed ``varkernels`` package): they
verify the GPU code on machines without a GPU (docs/design.md §4.2 and §4.3) and are imported by tests/ and
benchmarks/, run from the repository root (pytest's ``pythonpath``, benchmarks/_harness.py).

* ``aot`` — compile a Triton kernel ahead of time for sm_80 / sm_90 and read the cubin's register,
  shared-memory and local-memory (spill) usage with ``cuobjdump``; an occupancy estimate.
* ``traffic`` — count the bytes Triton kernels load and store in the interpreter, and the bytes
  every aten op reads and writes (the naive PyTorch measure).
* ``costmodel`` — roofline ESTIMATES of time and peak memory, traced from the CUDA code path on fake
  CUDA tensors (with its fake-CUDA shim).
* ``memory`` — peak extra memory of a CPU call from the resident set's high-water mark.
* ``trl_grpo_tests`` — run a TRL checkout's own ``GRPOTrainer`` tests against ``trl.GRPOTrainer`` and
  against ``OnlineVARTrainer``, offline, on locally built tiny stand-ins of the Hub's test checkpoints.

Nothing here needs a GPU, and nothing here measures time: every GPU time it prints is a roofline
estimate from counted bytes and a stated bandwidth.
"""
