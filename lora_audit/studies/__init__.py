"""Experiments that use lora-audit: the demo's pre-registered study (``demo``), the labelled panel
safety-scan is judged on (``zoo``, ``panel``) and their commands (``cli``).

Nothing in the product (every other ``lora_audit`` subpackage) imports this package; a test
(tests/studies/test_layering.py) checks it. Their commands reach ``lora-audit`` through the
``lora_audit.commands`` entry-point group.
"""
