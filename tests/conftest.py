import os
os.environ.setdefault("HEPTAPOD_FAST", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
import torch
torch.set_num_threads(min(2, os.cpu_count() or 1))
