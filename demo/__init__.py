"""`make demo`: raylm end to end on one machine (pretrain -> fine-tuning sweep -> Serve -> requests -> summary).

Entry: `python -m demo.main --config configs/demo/demo_cpu.yaml` (see demo/main.py).
"""
