"""The Hugging Face Hub: ``errors.py`` (failures as one line, tokens scrubbed, repo ids), ``download.py``
(what convert and load fetch), ``push.py`` (uploading a checkpoint), ``card.py`` (the model card)."""
