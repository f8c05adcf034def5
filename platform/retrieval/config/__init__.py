"""Typed specs of a training job and a serving app, loaded from YAML (the specs are in `retrieval.config.job`)."""

from retrieval.config.job import *  # noqa: F403
