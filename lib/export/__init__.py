"""The export wing (`make export`, jobs/export.py): merge, check, CTranslate2, whisper.cpp."""
