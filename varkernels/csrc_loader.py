"""Loader of the C++ CPU kernel (csrc/). Placeholder until the CPU backend lands."""


def load_extension(required: bool = False):
    if required:
        raise RuntimeError("backend='cpu': the C++ CPU kernel is not available in this build")
    return None
