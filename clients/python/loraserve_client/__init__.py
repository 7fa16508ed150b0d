"""Python client for a loraserve server: ``Client``, ``AsyncClient``, typed responses, the ``loraserve`` CLI.

from loraserve_client import Client

with Client("http://127.0.0.1:8000") as client:
    job = client.train("pirate", data=[{"prompt": "Hi", "response": "Arr!"}])
    job.wait()
    print(client.generate("Hi", adapter="pirate").text)
"""

from ._client import (
    AsyncClient,
    AsyncEventStream,
    AsyncTextStream,
    AsyncTrainingJob,
    Client,
    EventStream,
    TextStream,
    TrainingJob,
)
from ._core import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, RetryPolicy, __version__
from ._exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    JobFailedError,
    JobTimeoutError,
    LoraserveError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
)
from .types import (
    AdapterInfo,
    AdapterVersion,
    Dataset,
    GeneratedToken,
    Generation,
    Job,
    JobEvent,
    JobProgress,
    PromptToken,
    TopToken,
    Usage,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AdapterInfo",
    "AdapterVersion",
    "AsyncClient",
    "AsyncEventStream",
    "AsyncTextStream",
    "AsyncTrainingJob",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ConflictError",
    "Dataset",
    "EventStream",
    "GeneratedToken",
    "PromptToken",
    "Generation",
    "Job",
    "JobEvent",
    "JobFailedError",
    "JobProgress",
    "JobTimeoutError",
    "LoraserveError",
    "NotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RetryPolicy",
    "TextStream",
    "TrainingJob",
    "TopToken",
    "Usage",
    "__version__",
]
