"""Calls into ComfyUI internals that differ, or may differ, between the supported host versions."""

import folder_paths


def forget_file_list(folder_name: str) -> None:
    """Drops ComfyUI's cached file list of a model folder so the next listing sees new files.

    The cache is checked against folder modification times, which misses a file written within
    the same timestamp tick as the last listing (coarse mtimes on some file systems). ComfyUI
    0.3.75 keeps a module-level cache and a per-request one (`cache_helper`, active while the
    server answers /object_info); a newer host may have neither.
    """
    request_cache = getattr(folder_paths, "cache_helper", None)
    for cache in (getattr(folder_paths, "filename_list_cache", None), getattr(request_cache, "cache", None)):
        if cache is not None:
            cache.pop(folder_name, None)
