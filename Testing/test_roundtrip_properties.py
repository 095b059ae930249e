"""Property-based tests of the geometry round trips: volumes.model_grid, to_model_array and
labels_to_reference on random small volumes stored in random orientations and spacings.

A volume is built on a canonical LPS grid (array axes x: left, y: posterior, z: superior)
and then stored with its axes permuted and flipped, with the direction and origin that keep
every voxel at the same physical point (checked). Whatever the storage, the model must see
the same array, and labels must come back onto the stored grid unchanged.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from KANTumorSegLib.volumes import MODEL_SPACING_MM, SPACING_TOLERANCE, labels_to_reference, model_grid, to_model_array

SETTINGS = settings(max_examples=100, deadline=None)


def canonical_image(array_xyz: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]) -> sitk.Image:
    """An image whose index (i, j, k) holds array_xyz[i, j, k], with LPS axes."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def stored_as(canonical: sitk.Image, permutation: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> sitk.Image:
    """The same physical volume with stored axis a = canonical axis permutation[a], reversed where flips[a]."""
    array = sitk.GetArrayFromImage(canonical).transpose(2, 1, 0)  # (i, j, k)
    stored = array.transpose(permutation)
    for axis, flip in enumerate(flips):
        if flip:
            stored = np.flip(stored, axis)
    image = sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0)))
    size = canonical.GetSize()
    direction = np.zeros((3, 3))
    corner = [0, 0, 0]
    for axis, source in enumerate(permutation):
        direction[source, axis] = -1.0 if flips[axis] else 1.0
        if flips[axis]:
            corner[source] = size[source] - 1
    image.SetSpacing([canonical.GetSpacing()[source] for source in permutation])
    image.SetDirection(direction.flatten().tolist())
    image.SetOrigin(canonical.TransformIndexToPhysicalPoint(corner))
    return image


shapes = st.tuples(st.integers(3, 9), st.integers(3, 9), st.integers(2, 6))
permutations = st.permutations([0, 1, 2]).map(tuple)
flip_sets = st.tuples(st.booleans(), st.booleans(), st.booleans())
origins = st.tuples(*[st.floats(-150, 150, allow_nan=False) for _ in range(3)])
near_one = st.floats(1 - SPACING_TOLERANCE / 2, 1 + SPACING_TOLERANCE / 2)
in_plane = st.sampled_from([0.5, 0.75, 1.25, 2.0]) | st.floats(0.4, 2.5)
slice_spacing = st.sampled_from([1.0, 2.5, 5.0])


def random_labels(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=shape)


@SETTINGS
@given(shape=shapes, permutation=permutations, flips=flip_sets, origin=origins, seed=st.integers(0, 2**16),
       spacing=st.tuples(near_one, near_one, slice_spacing))
def test_storage_order_is_invisible_to_the_model_and_labels_come_back_exactly(shape, permutation, flips, origin, seed, spacing):
    array = random_labels(seed, shape)
    canonical = canonical_image(array, spacing, origin)
    stored = stored_as(canonical, permutation, flips)
    # The construction keeps every voxel at its physical point.
    for index in np.ndindex(2, 2, 2):
        canonical_index = [int(i * (n - 1)) for i, n in zip(index, shape)]
        stored_index = [0, 0, 0]
        for axis, source in enumerate(permutation):
            i = canonical_index[source]
            stored_index[axis] = shape[source] - 1 - i if flips[axis] else i
        assert np.allclose(canonical.TransformIndexToPhysicalPoint(canonical_index),
                           stored.TransformIndexToPhysicalPoint(stored_index), atol=1e-6)

    grid = model_grid(stored)
    assert not grid.resampled
    model_array = to_model_array(stored, grid.grid)
    # The model sees the canonical LPS array, whatever the storage.
    np.testing.assert_array_equal(model_array, array.astype(np.float32))
    back = labels_to_reference(model_array.astype(np.uint8), grid)
    assert back.GetSize() == stored.GetSize()
    assert np.allclose(back.GetOrigin(), stored.GetOrigin()) and np.allclose(back.GetDirection(), stored.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(stored))


def physical_points(image: sitk.Image) -> np.ndarray:
    """(X, Y, Z, 3) physical centre of every voxel, in the model-array layout (index order)."""
    size = np.array(image.GetSize())
    index = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).astype(float)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.array(image.GetOrigin()) + (index * np.array(image.GetSpacing())) @ direction.T


@SETTINGS
@given(shape=st.tuples(st.integers(6, 14), st.integers(6, 14), st.integers(2, 5)), permutation=permutations, flips=flip_sets,
       origin=origins, spacing=st.tuples(in_plane, in_plane, slice_spacing))
def test_model_grid_is_one_millimetre_in_plane_and_covers_the_same_field_of_view(shape, permutation, flips, origin, spacing):
    canonical = canonical_image(np.zeros(shape, np.uint8), spacing, origin)
    stored = stored_as(canonical, permutation, flips)
    grid = model_grid(stored).grid
    near = [abs(s - MODEL_SPACING_MM) <= SPACING_TOLERANCE * MODEL_SPACING_MM for s in spacing[:2]]
    expected_in_plane = [spacing[i] if all(near) else MODEL_SPACING_MM for i in range(2)]
    assert np.allclose(grid.GetSpacing(), [*expected_in_plane, spacing[2]])
    assert np.allclose(grid.GetDirection(), np.eye(3).flatten())  # LPS axes
    # Same field of view: centres within half a model voxel, extents within one.
    fov = np.array(shape) * np.array(spacing)
    model_fov = np.array(grid.GetSize()) * np.array(grid.GetSpacing())
    assert np.all(np.abs(model_fov - fov) <= np.array(grid.GetSpacing()) / 2 + 1e-6)
    centre = physical_points(canonical).reshape(-1, 3).mean(axis=0)
    model_centre = physical_points(grid).reshape(-1, 3).mean(axis=0)
    assert np.all(np.abs(model_centre - centre) <= np.array(grid.GetSpacing()) / 2 + 1e-6)


@SETTINGS
@given(shape=st.tuples(st.integers(6, 14), st.integers(6, 14), st.integers(2, 5)), permutation=permutations, flips=flip_sets,
       origin=origins, spacing=st.tuples(in_plane, in_plane, slice_spacing),
       slope=st.tuples(*[st.floats(-3, 3) for _ in range(3)]))
def test_resampling_to_the_model_grid_keeps_a_linear_intensity_field(shape, permutation, flips, origin, spacing, slope):
    # Linear interpolation reproduces a linear field exactly inside the sampled region.
    points = physical_points(canonical_image(np.zeros(shape, np.float32), spacing, origin))
    field = (points @ np.array(slope) + 500.0).astype(np.float32)
    canonical = canonical_image(field, spacing, origin)
    stored = stored_as(canonical, permutation, flips)
    grid = model_grid(stored).grid
    model_array = to_model_array(stored, grid)
    model_points = physical_points(grid)
    lower = np.array(origin)
    upper = lower + (np.array(shape) - 1) * np.array(spacing)
    inside = np.all((model_points >= lower + 1e-4) & (model_points <= upper - 1e-4), axis=-1)
    expected = model_points @ np.array(slope) + 500.0
    np.testing.assert_allclose(model_array[inside], expected[inside], atol=2e-3, rtol=1e-5)


@SETTINGS
@given(shape=st.tuples(st.integers(8, 16), st.integers(8, 16), st.integers(2, 5)), permutation=permutations, flips=flip_sets,
       origin=origins, spacing=st.tuples(in_plane, in_plane, slice_spacing), radius=st.floats(0.15, 0.45))
def test_labels_map_back_to_the_reference_grid_exactly_except_at_the_boundary(shape, permutation, flips, origin, spacing,
                                                                            radius):
    # Labels of a ball drawn on the model grid come back onto the stored grid by nearest
    # neighbour: a stored voxel can differ from the ball only within one model voxel of its surface.
    canonical = canonical_image(np.zeros(shape, np.uint8), spacing, origin)
    stored = stored_as(canonical, permutation, flips)
    grid = model_grid(stored)
    centre = physical_points(canonical).reshape(-1, 3).mean(axis=0)
    ball_radius = radius * float(np.min(np.array(shape[:2]) * np.array(spacing[:2])))
    model_distance = np.linalg.norm(physical_points(grid.grid) - centre, axis=-1)
    back = labels_to_reference(np.where(model_distance <= ball_radius, 4, 0).astype(np.uint8), grid)
    assert back.GetSize() == stored.GetSize()
    assert np.allclose(back.GetSpacing(), stored.GetSpacing()) and np.allclose(back.GetOrigin(), stored.GetOrigin())
    got = sitk.GetArrayFromImage(back).transpose(2, 1, 0)
    distance = np.linalg.norm(physical_points(stored) - centre, axis=-1)
    wrong = got != np.where(distance <= ball_radius, 4, 0)
    reach = np.linalg.norm(np.array(grid.grid.GetSpacing())) / 2 + 1e-6
    assert np.all(np.abs(distance[wrong] - ball_radius) <= reach)
