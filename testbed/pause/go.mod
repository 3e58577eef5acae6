module collabtrain.local/pause

go 1.24
