"""``python -m lora_audit``: the same command line as the ``lora-audit`` console script."""

from .cli import main

if __name__ == "__main__":
    main()
