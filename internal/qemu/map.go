package qemu

import (
	"context"
	"encoding/json"
	"fmt"
)

// MapExtent is one entry of `qemu-img map --output=json`: a range of the
// disk [Start, Start+Length) and where it comes from. Depth is the index
// in the chain of the image that holds it (0: the top image); an area no
// image holds is not Present. Data ranges of an image file report Offset,
// the range's place in that file (HasOffset false: none, such as a hole or
// a zero cluster without storage).
type MapExtent struct {
	Start     int64 `json:"start"`
	Length    int64 `json:"length"`
	Depth     int   `json:"depth"`
	Present   bool  `json:"present"`
	Zero      bool  `json:"zero"`
	Data      bool  `json:"data"`
	Offset    int64 `json:"offset"`
	HasOffset bool  `json:"-"`
}

// End returns the disk offset just past the extent.
func (e MapExtent) End() int64 { return e.Start + e.Length }

// MapArgs returns the qemu-img argv that maps the whole view of the QCOW2
// image at path (its backing chain included).
func MapArgs(path string) []string {
	return []string{"map", "--output=json", "-f", "qcow2", path}
}

// LayerMapArgs returns the qemu-img argv that maps the QCOW2 image at path
// alone, its backing file not opened: every range the image itself does
// not hold is reported not present. -U reads an image a server holds open
// (an export).
func LayerMapArgs(path string) ([]string, error) {
	spec, err := json.Marshal(map[string]any{
		"driver":  "qcow2",
		"backing": nil,
		"file":    map[string]any{"driver": "file", "filename": path},
	})
	if err != nil {
		return nil, err
	}
	return []string{"map", "--output=json", "-U", "json:" + string(spec)}, nil
}

// Map maps the whole view of the QCOW2 image at path.
func Map(ctx context.Context, path string) ([]MapExtent, error) {
	out, err := runImg(ctx, MapArgs(path))
	if err != nil {
		return nil, err
	}
	return ParseMap(out)
}

// MapLayer maps the QCOW2 image at path alone (LayerMapArgs).
func MapLayer(ctx context.Context, path string) ([]MapExtent, error) {
	args, err := LayerMapArgs(path)
	if err != nil {
		return nil, err
	}
	out, err := runImg(ctx, args)
	if err != nil {
		return nil, err
	}
	return ParseMap(out)
}

// ParseMap parses the JSON of `qemu-img map --output=json`. qemu-img before
// 6.0 has no "present"; there, data or zero means present (an unallocated
// area reports neither only when the chain does not hold it).
func ParseMap(out []byte) ([]MapExtent, error) {
	var raw []struct {
		MapExtent
		Present *bool  `json:"present"`
		Offset  *int64 `json:"offset"`
	}
	if err := json.Unmarshal(out, &raw); err != nil {
		return nil, fmt.Errorf("qemu: parse qemu-img map: %w", err)
	}
	ext := make([]MapExtent, len(raw))
	for i, r := range raw {
		ext[i] = r.MapExtent
		if r.Present != nil {
			ext[i].Present = *r.Present
		} else {
			ext[i].Present = r.Data || r.Zero
		}
		if r.Offset != nil {
			ext[i].Offset, ext[i].HasOffset = *r.Offset, true
		}
		if e := ext[i]; e.Start < 0 || e.Length < 0 || e.Offset < 0 {
			return nil, fmt.Errorf("qemu: parse qemu-img map: a negative range in %+v", e)
		}
	}
	return ext, nil
}
