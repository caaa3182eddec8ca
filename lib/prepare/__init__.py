"""The prepare wing (`make prepare`, jobs/prepare.py): sources, the worker pool, the staging folder."""
