"""Write the untrained tiny BERT as a Hugging Face model directory (config.json + model.safetensors).

    python examples/text_classification/make_model.py tiny_bert/
    dendrite-convert tiny_bert/ -o converted/
"""

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from task import tiny_bert_config  # noqa: E402

transformers.utils.logging.disable_progress_bar()
torch.manual_seed(0)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny_bert")
transformers.BertForSequenceClassification(tiny_bert_config()).save_pretrained(out)
print(f"wrote {out}")
