"""`--mode serve`: a catalogue index behind HTTP (FastAPI under uvicorn), and the page that searches it.

    GET  /                  the search page (catalogue/page.html): upload or drop a photo, click a result
    POST /search?k=10       multipart field `image`: {"query", "results": [{query, rank, id, path, label, score}]},
                            the rows `--mode search` prints for the same file
    GET  /search/{id}?k=10  the same for an indexed item, searched by its stored vector (the page's click)
    GET  /image/{id}        a JPEG thumbnail of an indexed item; nothing that is not in the index is served
    GET  /health            {"status": "ok", "items", "dim", "index_type", "max_upload_bytes"}

Uploads are refused with a 4xx and a one-line `detail`: empty (400), more than `max_upload_bytes` (413, counted
while the body arrives, so a huge upload is cut off, not buffered), more than `max_pixels` (413: a decompression
bomb is refused from its header, before decoding), not an image (415), truncated or corrupt (422).
One lock serialises the model (one forward pass at a time: it already uses every core), another the index
(searches, lookups, and `Catalogue.refresh`, which picks up `--mode add` / `remove` made by other processes).
Binds 127.0.0.1 unless told otherwise: the server has no authentication.
"""

from __future__ import annotations

import io
import shutil
import sys
import tempfile
import threading
from pathlib import Path

# At module level: with postponed annotations, FastAPI resolves `UploadFile` in this module's globals.
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response

PAGE = Path(__file__).with_name("page.html")
MAX_UPLOAD_BYTES = 20_000_000
MAX_PIXELS = 50_000_000  # a 48 MP phone photo passes; PIL's own bomb limit is 89 MP
MAX_K = 100
THUMBNAIL_PIXELS = 256
MAX_CONNECTIONS = 64  # beyond this uvicorn answers 503 at once instead of queueing without bound
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file
# reason (dataloaders.image_files) -> HTTP status
STATUS_OF_REASON = {"empty": 400, "too_large": 413, "not_an_image": 415, "truncated": 422, "corrupt": 422}


class UploadRefused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def result_rows(query: str, rows: list[dict]) -> list[dict]:
    """The JSON objects `--mode search` prints, one per result."""
    return [{"query": query, "rank": row["rank"], "id": row["id"], "path": row["path"], "label": row["label"],
             "score": round(row["score"], 6)} for row in rows]


def check_image_header(path: Path, max_bytes: int, max_pixels: int) -> None:
    """Refuse (UploadRefused) what the header already tells: empty, too many bytes or pixels, not an image."""
    from dataloaders.image_files import load_rgb_image

    try:
        width, height = load_rgb_image(path, decode=False, max_bytes=max_bytes).size
    except Exception as error:  # noqa: BLE001 - describe_image_error re-raises system errors, names the rest
        raise refusal(path, error) from None
    if width * height > max_pixels:
        raise UploadRefused(413, f"image of {width} x {height} pixels: more than the {max_pixels:,} this server "
                                 f"decodes (a decompression bomb?)")


def refusal(path: Path, error: BaseException) -> UploadRefused:
    from dataloaders.image_files import describe_image_error

    reason, detail = describe_image_error(path, error)
    what = {"empty": "empty upload", "not_an_image": "not an image (JPEG, PNG, WebP, ... expected)",
            "too_large": "image too large", "truncated": "truncated image", "corrupt": "image cannot be decoded"}
    return UploadRefused(STATUS_OF_REASON.get(reason, 422), f"{what.get(reason, reason)}: {detail}")


def create_app(catalogue, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS):
    """The FastAPI app over an open `catalogue.Catalogue` (see the module docstring for the routes)."""
    from dataloaders.image_files import is_system_error, load_rgb_image

    # The model's lock is held for a forward pass (up to a second on a CPU); the index's only for a search or a
    # lookup (milliseconds), so thumbnails and /health do not wait for an embedding.
    model_lock, index_lock = threading.Lock(), threading.Lock()
    rows_of_ids: dict[int, int] = {}
    mapped_generation = [None]  # the index generation rows_of_ids was made from

    def indexed_row(item_id: int) -> int:
        """Under the index lock: the row of `item_id`, after re-reading the index folder if another process
        changed it (`--mode add` / `remove`); 404 for an id the index does not hold."""
        catalogue.refresh()
        if mapped_generation[0] != catalogue.manifest["generation"]:
            rows_of_ids.clear()
            rows_of_ids.update((item["id"], row) for row, item in enumerate(catalogue.items))
            mapped_generation[0] = catalogue.manifest["generation"]
        if item_id not in rows_of_ids:
            raise HTTPException(404, f"no item {item_id} in the index")
        return rows_of_ids[item_id]

    app = FastAPI(title="Catalogue search", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    def search_page() -> str:
        return page

    @app.get("/health")
    def health() -> dict:
        with index_lock:
            catalogue.refresh()
            return {"status": "ok", "items": len(catalogue), "dim": catalogue.dim, "index_type": catalogue.index_type,
                    "max_upload_bytes": max_upload_bytes}

    # Plain `def` routes run in FastAPI's thread pool: a route waiting for a lock blocks no other route.
    # FastAPI counts the body as it arrives and answers 413 past the limit: a huge upload is never buffered.
    @app.post("/search", max_body_size=max_upload_bytes + MULTIPART_OVERHEAD_BYTES)
    def search_upload(image: UploadFile = File(...), k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        name = Path(image.filename or "upload").name
        with tempfile.TemporaryDirectory(prefix="catalogue-upload-") as folder:
            path = Path(folder) / "upload"
            with open(path, "wb") as stream:
                shutil.copyfileobj(image.file, stream)
            try:
                check_image_header(path, max_upload_bytes, max_pixels)
                with model_lock:  # read and embedded as `--mode search` reads and embeds a file
                    vectors = catalogue.embed_images([path])
            except UploadRefused as refused:
                raise HTTPException(refused.status, str(refused)) from None
            except (OSError, ValueError, SyntaxError) as error:  # the decoders' ways of saying "bad data"
                if is_system_error(error):
                    raise
                refused = refusal(path, error)
                raise HTTPException(refused.status, str(refused)) from None
        with index_lock:
            catalogue.refresh()
            rows = catalogue.search_vectors(vectors, k)[0]
        return {"query": name, "results": result_rows(name, rows)}

    @app.get("/search/{item_id}")
    def search_item(item_id: int, k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        with index_lock:
            row = indexed_row(item_id)
            item = catalogue.items[row]
            rows = catalogue.search_vectors(catalogue.vectors[row], k)[0]
        return {"query": item["path"], "query_id": item_id, "results": result_rows(item["path"], rows)}

    @app.get("/image/{item_id}")
    def thumbnail(item_id: int) -> Response:
        with index_lock:
            item = catalogue.items[indexed_row(item_id)]
        try:
            picture = load_rgb_image(Path(item["path"]), draft_size=THUMBNAIL_PIXELS)
        except Exception as error:  # noqa: BLE001 - a file listed in the index but gone or damaged since
            if is_system_error(error):
                raise
            raise HTTPException(404, f"item {item_id}'s file {item['path']} cannot be read") from None
        picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
        encoded = io.BytesIO()
        picture.save(encoded, format="JPEG", quality=85)
        # An id is never reused for other content (ids only grow), so the browser may keep it.
        return Response(encoded.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    return app


def http_server(catalogue, host: str = "127.0.0.1", port: int = 8000, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                log_level: str = "warning"):
    """The uvicorn server of `create_app(catalogue)`: `.run()` serves until SIGINT / SIGTERM (or `.should_exit`)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(create_app(catalogue, max_upload_bytes), host=host, port=port,
                                         limit_concurrency=MAX_CONNECTIONS, log_level=log_level))


def run_from_arguments(config, arguments) -> None:
    """`--mode serve --index DIR [--host 127.0.0.1] [--port 8000]`: load the model now, then serve until Ctrl-C."""
    from modes.catalogue import open_catalogue

    catalogue = open_catalogue(config, arguments)
    catalogue.embedder  # noqa: B018 - load (and check) the model before the first request, not during it
    server = http_server(catalogue, arguments.host, arguments.port,
                         max_upload_bytes=min(MAX_UPLOAD_BYTES, config.data.max_image_bytes),
                         log_level="info" if arguments.debug else "warning")
    print(f"serving {arguments.index} ({len(catalogue)} items, {catalogue.index_type}) at "
          f"http://{arguments.host}:{arguments.port}/ (Ctrl-C stops)", flush=True)
    if arguments.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {arguments.host} lets other machines search this index and see its images; the "
              f"server has no authentication", file=sys.stderr)
    server.run()
