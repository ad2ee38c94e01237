"""Pagination of every API list: ``?page=N``, 50 items a page."""

from __future__ import annotations

from rest_framework import pagination


class PageNumberPagination(pagination.PageNumberPagination):
    """Fixed pages of 50 (settings.REST_FRAMEWORK["PAGE_SIZE"])."""

    page_size = 50
