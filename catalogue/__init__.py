"""A searchable catalogue: image vectors from a trained checkpoint in a faiss index folder, and the portable model.

Python API (stable; the service and the bench build on it):

    from catalogue import Catalogue
    catalogue = Catalogue.load("models_ckpt/demo/index")     # reads the index only; verifies the files' sha256
    results = catalogue.search(["photo.jpg"], k=5)            # paths or PIL images -> one list per query
    results[0][0]  # {"id": 17, "path": "/abs/img.jpg", "label": 42 or None, "score": 0.93, "rank": 1}
    vectors = catalogue.embed_images([pil_image])             # (Q, D) float32 unit rows, as the catalogue's
    catalogue.search_vectors(vectors, k=5)                    # the same result lists; (D,) is one query
    catalogue.add(["new.jpg"], labels=[7])                    # {"added": [item], "duplicates": [{"path", "same_as"}]}
    catalogue.remove([17])                                    # ids removed; an unknown id removes nothing
    catalogue.refresh()                                       # re-read if another process changed the folder

`Catalogue.load(folder, checkpoint=None, device="cpu", precision=None, verify=True, search_parameters=None)`:
the model is loaded at the first embedding, from the checkpoint the manifest names (or `checkpoint`, whose
weights hash must be the manifest's). Items are dicts {"id", "path", "label", "sha256"} (`catalogue.items`,
`catalogue.item(id)`); `catalogue.vectors` is (N, D) float32, row i = item i; `catalogue.manifest` the
manifest dict; `len(catalogue)`, `catalogue.dim`. Scores are inner products of unit vectors (cosine).
Errors: `CatalogueError` (one line: missing or damaged files, another model's vectors or checkpoint);
images that cannot be read raise `dataloaders.BadImageError`.

Modules: `store` (the folder on disk, atomic generations), `index_types` (faiss index kinds), `embedding`
(checkpoint -> vectors for single images), `sources` (what to index), `build` (resumable chunked build,
or from saved evaluation outputs or vectors: `build_from_vectors`), `api` (`Catalogue`), `pictures` (the
search grid), `export` (Hugging Face style folder + model card). The command line is `modes/catalogue.py`;
details in docs/catalogue.md.
"""

from .api import Catalogue
from .embedding import ModelMismatchError
from .store import CatalogueError

__all__ = ["Catalogue", "CatalogueError", "ModelMismatchError"]
