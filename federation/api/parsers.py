"""Request body parsing: JSON only, refused above DATA_UPLOAD_MAX_MEMORY_SIZE.

DRF's JSONParser reads the request stream directly, so Django's own body limit never applies to
it (and the ASGI handler buffers any size): the limit is enforced here, before parsing.
"""

from __future__ import annotations

import io
from typing import Any

from django.conf import settings
from rest_framework.parsers import JSONParser, MultiPartParser

from federation.api.exceptions import RequestTooLarge


class LimitedJSONParser(JSONParser):
    """JSON bodies of at most DATA_UPLOAD_MAX_MEMORY_SIZE bytes (else 413)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None:
            meta = parser_context["request"].META if parser_context else {}
            try:
                declared = int(meta.get("CONTENT_LENGTH") or 0)
            except ValueError:
                declared = 0
            if declared > limit:
                raise RequestTooLarge()
            # Read one byte more than allowed: a body that lied about its length is caught too.
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise RequestTooLarge()
            stream = io.BytesIO(body)
        return super().parse(stream, media_type, parser_context)


class LimitedMultiPartParser(MultiPartParser):
    """multipart/form-data bodies (a model upload) of at most QUORUM_MAX_UPLOADED_MODEL_BYTES
    plus DATA_UPLOAD_MAX_MEMORY_SIZE for the other fields (else 413), refused by their declared
    length before a byte is read; Django's parser caps the fields and spools the file."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        limit = settings.QUORUM_MAX_UPLOADED_MODEL_BYTES + (
            settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 0
        )
        meta = parser_context["request"].META if parser_context else {}
        try:
            declared = int(meta.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            raise RequestTooLarge(limit)
        return super().parse(stream, media_type, parser_context)
