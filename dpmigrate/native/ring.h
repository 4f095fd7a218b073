/* placeholder: replaced by the shm ring */
