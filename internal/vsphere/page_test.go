package vsphere

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/vmware/govmomi/vim25/types"
)

// TestPageChangedAreas drives the paging loop with scripted answers, for
// the server behaviours the lab does not show.
func TestPageChangedAreas(t *testing.T) {
	ext := func(s, l int64) types.DiskChangeExtent { return types.DiskChangeExtent{Start: s, Length: l} }
	type answer struct {
		wantStart int64
		info      types.DiskChangeInfo
	}
	for _, tc := range []struct {
		name     string
		capacity int64
		answers  []answer
		want     []area
		err      string
	}{
		{
			name: "an answer that describes the whole disk is the only query", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 1000, ChangedArea: []types.DiskChangeExtent{ext(100, 10), ext(500, 20)}}},
			},
			want: []area{{100, 10}, {500, 20}},
		},
		{
			name: "empty page continues from start+length", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 400}},
				{400, types.DiskChangeInfo{StartOffset: 400, Length: 600, ChangedArea: []types.DiskChangeExtent{ext(500, 10)}}},
			},
			want: []area{{500, 10}},
		},
		{
			name: "a page continues from the end of its range, not of its last area", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 400, ChangedArea: []types.DiskChangeExtent{ext(100, 10)}}},
				{400, types.DiskChangeInfo{StartOffset: 400, Length: 600, ChangedArea: []types.DiskChangeExtent{ext(700, 10)}}},
			},
			want: []area{{100, 10}, {700, 10}},
		},
		{
			name: "a range that begins past the offset asked is an error", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 100, Length: 900, ChangedArea: []types.DiskChangeExtent{ext(200, 10)}}},
			},
			err: "past the offset asked",
		},
		{
			name: "an area past the range is left to the next query", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 400, ChangedArea: []types.DiskChangeExtent{ext(100, 10), ext(600, 10)}}},
				{400, types.DiskChangeInfo{StartOffset: 400, Length: 600, ChangedArea: []types.DiskChangeExtent{ext(450, 10), ext(600, 10)}}},
			},
			want: []area{{100, 10}, {450, 10}, {600, 10}},
		},
		{
			name: "an area across the range's end moves the next query past it", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 400, ChangedArea: []types.DiskChangeExtent{ext(390, 20)}}},
				{410, types.DiskChangeInfo{StartOffset: 410, Length: 590}},
			},
			want: []area{{390, 20}},
		},
		{
			name: "an answer without a length describes up to its last area", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, ChangedArea: []types.DiskChangeExtent{ext(100, 10)}}},
				{110, types.DiskChangeInfo{StartOffset: 110, Length: 890}},
			},
			want: []area{{100, 10}},
		},
		{
			name: "overlapping pages and an area past the end are clipped", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 200, ChangedArea: []types.DiskChangeExtent{ext(0, 100), ext(150, 50)}}},
				{200, types.DiskChangeInfo{StartOffset: 200, Length: 800, ChangedArea: []types.DiskChangeExtent{ext(180, 40), ext(900, 200)}}},
			},
			want: []area{{0, 100}, {150, 50}, {200, 20}, {900, 100}},
		},
		{
			name: "no progress", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 100}},
				{100, types.DiskChangeInfo{StartOffset: 100, Length: 0}},
			},
			want: nil, err: "does not move forward",
		},
		{
			name: "areas behind the start", capacity: 1000,
			answers: []answer{
				{0, types.DiskChangeInfo{StartOffset: 0, Length: 50, ChangedArea: []types.DiskChangeExtent{ext(0, 50)}}},
				{50, types.DiskChangeInfo{StartOffset: 50, Length: 0, ChangedArea: []types.DiskChangeExtent{ext(10, 20)}}},
			},
			want: []area{{0, 50}}, err: "does not move forward",
		},
		{
			name: "negative length", capacity: 1000,
			answers: []answer{{0, types.DiskChangeInfo{StartOffset: 0, Length: 1000, ChangedArea: []types.DiskChangeExtent{ext(0, -1)}}}},
			err:     "bad area",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i := 0
			query := func(start int64) (types.DiskChangeInfo, error) {
				if i >= len(tc.answers) {
					return types.DiskChangeInfo{}, fmt.Errorf("query %d from %d: no more answers scripted", i, start)
				}
				a := tc.answers[i]
				i++
				if start != a.wantStart {
					return types.DiskChangeInfo{}, fmt.Errorf("query %d from %d, want %d", i, start, a.wantStart)
				}
				return a.info, nil
			}
			var got []area
			err := pageChangedAreas("disk 1", tc.capacity, query, func(off, n int64) error {
				got = append(got, area{off, n})
				return nil
			})
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("error %v, want %q", err, tc.err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("areas %v, want %v", got, tc.want)
			}
			if tc.err == "" && i != len(tc.answers) {
				t.Errorf("%d queries, want %d", i, len(tc.answers))
			}
		})
	}
}
