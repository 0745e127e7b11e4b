"""Jobs: the batch pipeline run on request, over files or an uploaded archive, with a callback
when it ends."""
