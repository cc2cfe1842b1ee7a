"""The KV cache of a decode batch: transformers' DynamicLayer, stored with spare columns.

transformers' DynamicLayer appends each decode step's keys and values with torch.cat, a copy of the whole
cache for every layer and step: at 30 rows of 250 columns (benchmarks.serve_load's tiny model, one
thread) eight such copies cost 2.6 ms of an ~11 ms decode step. Here a layer's `keys` and `values` are
views into buffers with spare columns: a step writes its column in place and a buffer is copied only when
it fills (every COLUMN_HEADROOM steps). Rows that leave (`select_rows`) or join (`merge_rows`) a running
batch are written into new buffers in one copy each. Everything transformers reads (`keys`, `values`,
`get_seq_length`, mask sizes) is what a DynamicLayer of the same content would give.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

COLUMN_HEADROOM = 32  # decode steps between two copies of a layer's buffers


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are the first columns of buffers with room to grow."""

    key_buffer: torch.Tensor | None = None
    value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._viewing_buffers() or end > self.key_buffer.shape[-2]:
            # The first update, a full buffer, or keys/values replaced from outside: copy into new buffers.
            shape = (*key_states.shape[:2], end + COLUMN_HEADROOM, key_states.shape[-1])
            self.key_buffer = key_states.new_empty(shape)
            self.value_buffer = value_states.new_empty((*shape[:3], value_states.shape[-1]))
            if length:
                self.key_buffer[:, :, :length].copy_(self.keys)
                self.value_buffer[:, :, :length].copy_(self.values)
        self.key_buffer[:, :, length:end].copy_(key_states)
        self.value_buffer[:, :, length:end].copy_(value_states)
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def _viewing_buffers(self) -> bool:
        return (
            self.key_buffer is not None
            and self.keys.data_ptr() == self.key_buffer.data_ptr()
            and self.keys.shape[0] == self.key_buffer.shape[0]
            and self.values.data_ptr() == self.value_buffer.data_ptr()
        )

    def _adopt(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, width: int) -> None:
        self.key_buffer, self.value_buffer = key_buffer, value_buffer
        self.keys, self.values = key_buffer[:, :, :width], value_buffer[:, :, :width]


class GrowingCache(DynamicCache):
    """A DynamicCache of GrowingLayers (created as the model's layers first write to it)."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


def select_rows(layer: GrowingLayer, index: torch.Tensor, first_column: int) -> None:
    """Keep the rows `index` (in that order) and the columns from `first_column` on, in one copy."""
    width = layer.keys.shape[-2] - first_column
    buffers = []
    for states in (layer.keys, layer.values):
        buffer = states.new_empty((len(index), states.shape[1], width + COLUMN_HEADROOM, states.shape[-1]))
        torch.index_select(states[:, :, first_column:], 0, index, out=buffer[:, :, :width])
        buffers.append(buffer)
    layer._adopt(*buffers, width)


def merge_rows(layer: GrowingLayer, joining: GrowingLayer) -> None:
    """Append `joining`'s rows below `layer`'s, both right-aligned (left-padded with zeros) to the wider of the two."""
    width = max(layer.keys.shape[-2], joining.keys.shape[-2])
    rows = layer.keys.shape[0]
    buffers = []
    for old, new in ((layer.keys, joining.keys), (layer.values, joining.values)):
        buffer = old.new_empty((rows + new.shape[0], old.shape[1], width + COLUMN_HEADROOM, old.shape[-1]))
        for start, stop, states in ((0, rows, old), (rows, rows + new.shape[0], new)):
            pad = width - states.shape[-2]
            buffer[start:stop, :, :pad].zero_()
            buffer[start:stop, :, pad:width].copy_(states)
        buffers.append(buffer)
    layer._adopt(*buffers, width)
