"""CoFi structured pruning of BERT-family sequence classifiers.

Importing the package registers the model with transformers' Auto classes, so a
saved model loads with ``AutoModelForSequenceClassification.from_pretrained(path)``
without remote code wherever ``cofi`` is installed.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from cofi.configuration_cofi import CofiConfig
from cofi.modeling_cofi import CofiForSequenceClassification

AutoConfig.register(CofiConfig.model_type, CofiConfig, exist_ok=True)
AutoModelForSequenceClassification.register(CofiConfig, CofiForSequenceClassification, exist_ok=True)

__all__ = ["CofiConfig", "CofiForSequenceClassification"]
