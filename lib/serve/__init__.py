"""The serve wing (`make serve`, jobs/serve.py): the page that tries a run."""
