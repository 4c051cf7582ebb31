"""`python -m dqo_megatron ...` (also what `torchrun -m dqo_megatron ...` runs)."""

from dqo_megatron.cli import main

if __name__ == "__main__":
    main()
