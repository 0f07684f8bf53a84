"""Request and response bodies of the lookup service's HTTP API, as pydantic models (they make /openapi.json).

`KnnRequest`, `MetadataRequest` and the list answers follow clip-retrieval's service
(`/knn-service`, `/metadata`, `/indices-list`), so its `ClipClient` and front end can talk to
lvd: unknown fields (its safety-model and aesthetic options) are accepted and ignored, the ones
lvd adds (`set`, `label`, `cluster`, `query`, `return_embeddings`) are optional.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# values one filter may list (ServeOptions.max_filter_values is the service's own check)
MAX_FILTER_VALUES = 1000
MAX_QUERY_PARTS = 16


class ErrorBody(BaseModel):
    error: str


class FilterFields(BaseModel):
    """lvd's result filters: rows whose set / label / cluster is one of the given values."""

    set: list[str] | None = Field(
        default=None,
        max_length=MAX_FILTER_VALUES,
        description="keep results of these sets (pool, seed:NAME, eval:NAME)",
    )
    label: list[str] | None = Field(
        default=None, max_length=MAX_FILTER_VALUES, description="keep results with these labels"
    )
    cluster: list[int] | None = Field(
        default=None, max_length=MAX_FILTER_VALUES, description="keep results in these clusters (cluster stage)"
    )
    deduplicate: bool = Field(default=False, description="one result per near-duplicate group of the dedup stage")
    return_embeddings: bool = Field(default=False, description="each result carries its stored vector, `embedding`")


class VectorSearch(FilterFields):
    model_config = ConfigDict(extra="ignore")
    vector: list[float] = Field(description="a query vector of the index's dimension")
    k: int | None = Field(default=None, description="number of results (default 10)")
    index: str | None = Field(default=None, description="index name (default: the first)")


class QueryPartBody(BaseModel):
    """One weighted term of a query: exactly one of text, image, image_url, embedding, id."""

    model_config = ConfigDict(extra="forbid")
    weight: float = Field(default=1.0, description="the term's weight; negative ones steer away")
    text: str | None = Field(default=None, description="a text (indexes embedded with CLIP or SigLIP)")
    image: str | None = Field(default=None, description="an image, base64")
    image_url: str | None = Field(default=None, description="the url of a result of this server")
    embedding: list[float] | None = Field(default=None, description="a vector of the index's dimension")
    id: int | None = Field(default=None, description="an indexed image, by its manifest id")


class MixedSearch(FilterFields):
    """A weighted sum of parts, normalised before the search (`+0.7 image +0.3 text -0.2 text`)."""

    model_config = ConfigDict(extra="ignore")
    query: list[QueryPartBody] = Field(min_length=1, max_length=MAX_QUERY_PARTS)
    k: int | None = Field(default=None, description="number of results (default 10)")
    index: str | None = Field(default=None, description="index name (default: the first)")


class KnnRequest(FilterFields):
    """clip-retrieval's `/knn-service` body: exactly one of `text`, `image`, `image_url`, `embedding_input`
    (or lvd's `query`, a weighted sum of parts)."""

    model_config = ConfigDict(extra="ignore")
    text: str | None = Field(default=None, description="search by text (indexes embedded with CLIP or SigLIP)")
    image: str | None = Field(default=None, description="the query image, base64")
    image_url: str | None = Field(
        default=None, description="the url of a result of this server (other URLs are refused: it never fetches)"
    )
    embedding_input: list[float] | None = Field(default=None, description="a query vector")
    query: list[QueryPartBody] | None = Field(
        default=None, max_length=MAX_QUERY_PARTS, description="lvd: a weighted sum of parts, normalised"
    )
    modality: Literal["image", "text"] = Field(default="image", description="which embeddings to search: only image")
    num_images: int = Field(default=40, description="number of results (at most the server's largest k)")
    num_result_ids: int | None = Field(
        default=None, ge=1, description="accepted for compatibility; lvd searches as deep as filters and dedup need"
    )
    indice_name: str | None = Field(default=None, description="index name (default: the first)")


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    ids: list[int] = Field(description="manifest ids")
    indice_name: str | None = None


class Hit(BaseModel):
    id: int
    id_str: str = Field(description="the id as a string (JavaScript numbers keep only 53 bits)")
    rank: int | None = None
    score: float | None = None
    set: str | None = None
    label: str | None = None
    cluster: int | None = None
    kind: str | None = None
    key: str | None = Field(default=None, description="the image's path within its source (a file name if absolute)")
    thumbnail: str | None = Field(default=None, description="the image route's path (signed when there is a key)")
    url: str | None = Field(default=None, description="the image route's absolute URL, for <img> (clip-retrieval)")
    caption: str | None = None
    embedding: list[float] | None = Field(default=None, description="the stored vector, with return_embeddings")
    source: str | None = Field(default=None, description="with --expose-paths only")
    path: str | None = Field(default=None, description="with --expose-paths only")


class KnnHit(Hit):
    similarity: float


class SearchAnswer(BaseModel):
    results: list[Hit]
    took_ms: float
    index: str
    query_id: int | None = None


class MetadataItem(BaseModel):
    id: int
    metadata: Hit


class Health(BaseModel):
    status: Literal["ok"]
    vectors: int
    indices: dict[str, int]
